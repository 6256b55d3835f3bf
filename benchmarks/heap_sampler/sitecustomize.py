"""The most heap memory a benchmarked process has allocated at once (imported by Python at start-up from PYTHONPATH).

With BPO_BENCH_HEAP_DIR set, a thread reads glibc's mallinfo2 every millisecond (bytes in use in the heap plus those
in mmapped blocks: what is allocated, not what the allocator keeps resident after a free) and at exit writes the
largest value to BPO_BENCH_HEAP_DIR/<pid>.json. It is the CPU counterpart of torch.cuda.max_memory_allocated: a
process's resident set also counts freed blocks that glibc has not handed back, which is about the allocator as much
as the program. benchmarks/step_bench.py runs bpo and TRL both with it; nothing else imports it.
"""

import os

if os.environ.get("BPO_BENCH_HEAP_DIR"):
    import atexit
    import ctypes
    import json
    import threading
    import time

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _Mallinfo2
    _peak = [0]

    def _sample():
        while True:
            info = _libc.mallinfo2()
            _peak[0] = max(_peak[0], info.uordblks + info.hblkhd)
            time.sleep(0.001)

    def _write():
        path = os.path.join(os.environ["BPO_BENCH_HEAP_DIR"], f"{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump({"peak_heap_mb": _peak[0] / 2**20}, f)

    threading.Thread(target=_sample, daemon=True, name="heap-sampler").start()
    atexit.register(_write)
