"""Writing whole or not at all: a file under its real name is always complete, and a user's OUT_DIR never holds half
a model."""

import contextlib
import os
import shutil
import tempfile
import threading


def write_text(path, text):
    """Write `text` (a str, or an iterable of str written in turn) to a temporary name beside `path`, then rename it
    over `path`. The temporary name is this process's and thread's own, so concurrent writers of one path never
    share one; it is removed when writing fails."""
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            if isinstance(text, str):
                f.write(text)
            else:
                f.writelines(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def publish_dir(out_dir, tmp=None):
    """Yield a temporary directory beside out_dir. When the block succeeds it replaces out_dir (the old one renamed
    aside, the new one renamed in, the old one deleted); when it raises, it is removed. `tmp`: a fixed name for it, so what a killed run leaves behind
    is found and removed by the next run to the same place (the default is a fresh mkdtemp name)."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    if tmp is None:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}-", dir=parent)
    else:
        if os.path.exists(tmp):
            print(f"removing {tmp}, left by a run that did not finish", flush=True)
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    try:
        yield tmp
        # Aside, then in: a kill at any moment leaves out_dir whole (old or new) or, between the two renames, the old
        # one whole under the aside name; deleting it in place first would leave half a directory.
        aside = os.path.join(parent, f".{os.path.basename(out_dir)}.replaced")
        if os.path.exists(aside):
            shutil.rmtree(aside)  # left by a run killed while deleting it: the directory it held was replaced
        if os.path.exists(out_dir):
            os.rename(out_dir, aside)
        os.rename(tmp, out_dir)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
