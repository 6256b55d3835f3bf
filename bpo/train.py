"""BPO training of a vision-language model with DeepSpeed ZeRO-3 and a hand-written loop.

One GPU node / many:   deepspeed --num_gpus 8 bpo/train.py --config configs/bpo_7b.yaml [section.key=value ...]
Multi-node (Slurm):    srun torchrun --nnodes $N --nproc_per_node 8 ... bpo/train.py --config ...  (see slurm/)
CPU, 2 processes:      DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 bpo/train.py \
                           --config configs/smoke.yaml train.ds_config=ds_configs/zero3_cpu.json
Resume after a kill:   the same command with --resume (train.resume=true); a changed math key is refused unless
                       accepted with --allow-change KEY (docs/checkpoints.md)
Memory levers:         model.finetune=lora (qlora: CUDA only), optim.name=adamw_8bit | paged_adamw_8bit (docs/memory.md)
"""

import math
import os
import sys
import time

if not __package__:  # run as a file, as the deepspeed launcher does: put the repo root on the path so `bpo` imports
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bpo import cli, optim, run_record
from bpo.runtime import checkpoint, dist, ds_configs, reshard, run_lock, run_log
from bpo.model import lora
from bpo.data import sampler
from bpo.config import ConfigError, check_model_dir, load_config, require, save_config, to_yaml, with_absolute_paths
from bpo.data.records import drop_cut_blind, enforce_max_image_pixels, load_records
from bpo.runtime.faults import maybe_crash, maybe_poison, maybe_slow
from bpo.loss import bpo_loss, finalize_metrics, nll_loss
from bpo.model.load import describe, is_zero3, load_model, resolve_attn_implementation, text_hidden_size
from bpo.model.parts import set_gradient_checkpointing, set_trainable
from bpo.model.scorer import SequenceScorer, choose_layout, model_inputs
from bpo.ops.logprobs import describe_impl, response_mask, sequence_logps
from bpo.model.reference import AdapterOffReference, LiveReference
from bpo.schedule import build_scheduler
from bpo.runtime.stop import EXIT_CODE as STOPPED_EXIT_CODE, Diverged, StopRequest
from bpo.data.dataset import PreferenceDataset, split_by_kind
from bpo.data.usable import usable_records
from bpo.ref_cache.store import CachedReference
from bpo.data.chat import load_chat
from bpo.data.encode import blank_image_example
from bpo.data.shared import make_collate
from bpo.export.job import export


def parse_args(argv=None):
    def flags(parser):
        parser.add_argument("--resume", action="store_true",
                            help="continue from the run's newest complete checkpoint, on any number of ranks "
                                 "(= train.resume=true)")
        parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                            help="with --resume: accept a changed math key (loss.beta, optim.lr, ...) or data.contents "
                                 "(the training data); repeatable (= train.resume_allow=[KEY, ...])")

    args = cli.parse_job_args(__doc__, argv, flags)
    if args.resume:
        args.overrides.append("train.resume=true")
    if args.allow_change:
        args.overrides.append(f"train.resume_allow=[{', '.join(args.allow_change)}]")
    return args


def build_ds_config(cfg, world_size, hidden_size=None):
    """Read the DeepSpeed JSON and fill its "auto" entries from the one config tree; an entry the config decides that
    the file sets to another value is an error naming both (bpo.runtime.ds_configs.fill).

    ZeRO's bucket sizes follow the language model's `hidden_size` as transformers' DeepSpeed integration sizes them
    (H^2 elements per gradient-reduction bucket, 0.9 H^2 per parameter prefetch, parameters under 10 H kept whole):
    DeepSpeed's own default bucket, 5e8 elements, is allocated whole with contiguous_gradients, 1 GB in bf16 per
    rank whatever the model. Without `hidden_size` they are left to DeepSpeed."""
    path = cfg.train.ds_config
    ds = ds_configs.read(path)
    t = cfg.train
    for key, value, config_key in [
        ("train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps", t.grad_accum, "train.grad_accum"),
        ("train_batch_size", t.micro_batch_size * t.grad_accum * world_size,
         f"train.micro_batch_size x train.grad_accum x {world_size} ranks"),
        ("gradient_clipping", cfg.optim.grad_clip, "optim.grad_clip"),
    ]:
        ds_configs.fill(ds, key, value, path, key, config_key)
    opt = ds.get("optimizer", {}).get("params", {})
    for key, value in {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
                       "weight_decay": cfg.optim.weight_decay}.items():
        if key in opt:  # an optimizer parameter the file leaves out is DeepSpeed's default: not bpo's to add
            ds_configs.fill(opt, key, value, path, f"optimizer.params.{key}", f"optim.{key}")
    zero = ds.get("zero_optimization", {})
    sizes = {"reduce_bucket_size": hidden_size ** 2, "stage3_prefetch_bucket_size": int(0.9 * hidden_size ** 2),
             "stage3_param_persistence_threshold": 10 * hidden_size} if hidden_size else {}
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            if key in sizes:
                zero[key] = sizes[key]
            else:
                zero.pop(key)  # DeepSpeed's own default
    ds_configs.fill_dtype(ds, cfg.model.dtype, path)
    return optim.adapt_ds_config(ds, cfg.optim, path)  # a bitsandbytes optimizer replaces its section


def build_data(cfg, chat, log):
    """Records -> the usable ones (bpo.data.usable, the rule every job shares) as a dataset. Bad records stop the
    run unless data.skip_bad."""
    records, bad = load_records(cfg.data.train_file, image_root=cfg.data.image_root,
                                check_images=cfg.data.check_images,
                                allow_outside_root=cfg.data.allow_outside_image_root,
                                max_image_pixels=cfg.data.max_image_pixels, split=cfg.data.split,
                                image_cache=cfg.data.image_cache)
    cut = 0
    if cfg.loss.type == "bpo" and not cfg.data.keep_cut_blind:
        records, cut = drop_cut_blind(records)
    responses = {"bpo": ("chosen", "rejected", "blind"), "dpo": ("chosen", "rejected"),
                 "sft": ("chosen",)}[cfg.loss.type]
    if cfg.loss.type == "bpo" and records and not any(r.blind for r in records):
        why = (f" ({cut} were cut at decode.max_new_tokens and left out: raise it and regenerate, or set "
               f"data.keep_cut_blind=true)" if cut else "")
        raise SystemExit(
            f"loss.type=bpo but no record in {cfg.data.train_file} has a usable `blind` response{why}. Generate "
            f"them with `deepspeed bpo/generate_blind.py --config ...` first, or train with loss.type=dpo.")
    records, truncated, bad = usable_records(records, bad, chat, cfg.data.image_root, cfg.data.max_length,
                                             responses, cfg.data.skip_bad, cfg.data.train_file, report=log.message)
    n_blind = sum(1 for r in records if r.blind)
    cut_note = (f", {cut} blind responses cut at decode.max_new_tokens left out of the blind term "
                f"(data.keep_cut_blind=true keeps them)" if cut else "")
    log.message(f"data: {len(records)} usable records ({n_blind} with a blind response), {len(bad)} skipped, "
                f"{truncated} with a response truncated to max_length={cfg.data.max_length}{cut_note}")
    if not records:
        raise SystemExit(f"no usable records in {cfg.data.train_file}")
    return PreferenceDataset(records, chat, cfg.data.image_root, cfg.data.max_length, responses=responses)


def build_policy(cfg, ds_config, total_steps, blank):
    """The trained model as a DeepSpeed engine; returns (engine, the bitsandbytes optimizer or None)."""
    import deepspeed

    model = load_model(cfg.model, ds_config=ds_config, quantize=cfg.model.finetune == "qlora")
    attn = resolve_attn_implementation(cfg.model.attn_implementation)
    if lora.uses_adapters(cfg.model):
        peft_config, parts = lora.add_adapters(model, cfg.model, cfg.lora)
        describe(model, None, attn)
        dist.print0(lora.describe(parts, cfg.model, cfg.lora))
        if dist.is_rank0():  # what bpo.export writes into an adapter directory
            lora.save_config(peft_config, cfg.train.output_dir)
    else:
        describe(model, set_trainable(model, cfg.model), attn)
    set_gradient_checkpointing(model, cfg.model)
    scorer = SequenceScorer(model, impl=cfg.loss.logprob_impl, chunk_size=cfg.loss.logprob_chunk_size, blank=blank,
                            zero3=is_zero3(ds_config), router_aux=cfg.loss.router_aux_coef > 0)
    params = [p for p in scorer.parameters() if p.requires_grad]
    client = optim.build_optimizer(params, cfg.optim)  # None: DeepSpeed builds the ds_config's optimizer
    dist.print0(optim.describe(cfg.optim, ds_config))
    # DeepSpeed steps the scheduler with the optimizer (once per accumulation) and keeps it in checkpoints.
    engine, *_ = deepspeed.initialize(model=scorer, model_parameters=params, optimizer=client, config=ds_config,
                                      lr_scheduler=lambda opt: build_scheduler(opt, total_steps, cfg.optim))
    freed = optim.share_fp32_master(engine.optimizer) if is_zero3(ds_config) else 0
    if freed:
        dist.print0(f"fp32 weights serve as their own fp32 master copy ({freed / 2**20:.0f} MiB not duplicated)")
    return engine, client


def build_reference(cfg, ds_config, chat, dataset, blank):
    """The reference: the offline cache when train.ref_cache is set (no reference weights are read at all); with
    LoRA and no train.ref_model_path, None: the policy itself with its adapters off (AdapterOffReference, built once
    the policy is); else a frozen ZeRO-3 inference engine holding a second copy of the model. loss.type=sft has
    none (None, and the policy stays the only model)."""
    if cfg.loss.type == "sft":
        return None
    if cfg.train.ref_cache:
        reference = CachedReference(cfg.train.ref_cache, cfg, chat.processor, cfg.data.train_file)
        reference.check_ids(dataset.records, dataset.responses)
        return reference
    if lora.uses_adapters(cfg.model) and not cfg.train.ref_model_path:
        return None
    import deepspeed

    ref_ds = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    model = load_model(cfg.model, path=cfg.train.ref_model_path or cfg.model.path, ds_config=ref_ds,
                       quantize=cfg.model.finetune == "qlora")
    model.requires_grad_(False)
    scorer = SequenceScorer(model, impl=cfg.loss.logprob_impl, chunk_size=cfg.loss.logprob_chunk_size, blank=blank,
                            zero3=is_zero3(ref_ds))
    engine, *_ = deepspeed.initialize(model=scorer, config=ref_ds)
    engine.eval()
    return LiveReference(engine, cfg.loss.reduction)


def open_run(cfg):
    """Rank 0, before anything is written to the run directory: lock it (bpo.runtime.run_lock); returns this start's number."""
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    note = run_lock.acquire(cfg.train.output_dir)
    if note:
        print(note, flush=True)
    return run_record.next_start(cfg.train.output_dir)


def record_start(cfg, point, start_n):
    """Rank 0: check this start against the run's identity (a refusal raises), keep it in RUN/history/, and only then
    write config.yaml, the config the run now uses."""
    notes, changes = run_record.check_resume(cfg, resuming=point is not None, world=dist.world_size())
    for line in notes:
        print(line, flush=True)
    verdict = f"resumed from step {point.step}" if point is not None else "started at step 0"
    run_record.write_history(cfg, start_n, verdict, changes)
    save_config(with_absolute_paths(cfg), os.path.join(cfg.train.output_dir, "config.yaml"))
    return changes


def apply_optim_config(engine, ds_config, optim_cfg):
    """After a resume: this run's lr, betas, eps and weight decay, not the ones the checkpoint's optimizer and
    scheduler state carry (torch's load_state_dict restores them, so a changed optim.lr would silently not apply).
    The schedule's shape is this run's already: LambdaLR keeps no lambda in its state."""
    given = ds_config.get("optimizer", {}).get("params", {})  # the ds_config's own numbers win, as at the start
    lr = given.get("lr", optim_cfg.lr)
    hyper = {"betas": tuple(given.get("betas", optim_cfg.betas)), "eps": given.get("eps", optim_cfg.eps),
             "weight_decay": given.get("weight_decay", optim_cfg.weight_decay)}
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=lr, lr=lr * factor(scheduler.last_epoch), **hyper)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def peak_memory_mb():
    """This rank's peak memory so far: allocated GPU memory on CUDA, else the process's max resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def preference_loss(token_logps, mask, ref_logps, batch, loss_cfg):
    """Per-token log-probs (R, M) -> per-example chosen/rejected/blind -> the BPO, DPO or SFT loss and its metric sums.

    ref_logps: the reference's (R,), reduced by loss.reduction; None for loss.type=sft. The NLL term (loss.type=sft,
    or loss.sft_weight > 0) reads each chosen response's log-prob per token, whatever loss.reduction is."""
    uses_nll = loss_cfg.type == "sft" or loss_cfg.sft_weight > 0
    if uses_nll:
        nll, nll_metrics = nll_loss(split_by_kind(sequence_logps(token_logps, mask, "mean"), batch)[0])
        if loss_cfg.type == "sft":
            return nll, nll_metrics
    pc, pr, pb = split_by_kind(sequence_logps(token_logps, mask, loss_cfg.reduction), batch)
    rc, rr, rb = split_by_kind(ref_logps, batch)
    blind = loss_cfg.type == "bpo"
    loss, metrics = bpo_loss(pc, pr, pb if blind else None, rc, rr, rb if blind else None, beta=loss_cfg.beta,
                             blind_weight=loss_cfg.blind_weight, blind_mask=batch["has_blind"].to(pc.device))
    if uses_nll:
        loss = loss + loss_cfg.sft_weight * nll
        metrics.update({"nll/chosen": nll_metrics["nll/chosen"], "loss": loss.detach() * pc.numel()})
    return loss, metrics


def add_router_aux(loss, metrics, scorer, coef):
    """loss + coef x the MoE router's auxiliary load-balancing loss of the forward just run (loss.router_aux_coef;
    bpo.model.moe.router_aux_loss_function), logged as router_aux. coef 0: the loss unchanged, the paper's objective."""
    if not coef:
        return loss, metrics
    aux = scorer.router_aux_loss  # scalar, this micro-batch's tokens
    loss = loss + coef * aux
    pairs = metrics["count/pairs"]  # metrics are sums over pairs, divided by their count once per step
    metrics.update(router_aux=aux.detach() * pairs, loss=loss.detach() * pairs)
    return loss, metrics


def train(cfg):
    """Run (or resume) training; returns 0 when done, bpo.runtime.stop.EXIT_CODE when stopped on request (checkpoint saved)."""
    require(cfg, "model.path", "data.train_file")
    lora.require_platform(cfg.model)  # QLoRA, FlexAttention: CUDA only; say so before anything starts
    check_model_dir(cfg.model.path, "model.path")
    if cfg.train.ref_model_path and not cfg.train.ref_cache:
        check_model_dir(cfg.train.ref_model_path, "train.ref_model_path")
    enforce_max_image_pixels(cfg.data.max_image_pixels)
    chat = load_chat(cfg.model.path, cfg.data.chat_template, cfg.model.trust_remote_code,
                     cfg.data.chat_template_kwargs)  # no template: fail first
    run_record.check_allow_list(cfg)
    dist.init_distributed()
    torch.manual_seed(cfg.train.seed)
    # First, before any data or weights load: a second job, a refused or damaged checkpoint fail in seconds. Only
    # rank 0 locks and writes; the others wait for its verdict.
    start_n = dist.on_rank0(lambda: open_run(cfg))
    try:
        point = checkpoint.plan_resume(cfg.train.output_dir, cfg.train.resume)
        dist.on_rank0(lambda: record_start(cfg, point, start_n))
    except (checkpoint.CheckpointError, ConfigError) as e:  # every rank has it (bpo.runtime.dist.on_rank0)
        dist.on_rank0(lambda: run_record.write_history(cfg, start_n, f"refused: {e}"))
        raise
    dist.print0(to_yaml(cfg))
    log = run_log.make_log(cfg.train.output_dir, tensorboard=cfg.train.tensorboard, plot=cfg.train.plot)

    dist.print0(chat.describe())
    dist.print0(describe_impl(cfg.loss.logprob_impl, cfg.loss.logprob_chunk_size, dist.device()))
    pad_id = chat.pad_id
    dataset = build_data(cfg, chat, log)
    blank = blank_image_example(chat)  # ZeRO-3 lockstep for micro-batches without an image (bpo.model.scorer)
    world, rank = dist.world_size(), dist.rank()
    per_epoch = sampler.steps_per_epoch(len(dataset), cfg.train.micro_batch_size, cfg.train.grad_accum, world)
    if per_epoch == 0:
        raise SystemExit(f"{len(dataset)} examples do not fill one global batch of "
                         f"{cfg.train.micro_batch_size * cfg.train.grad_accum * world}")
    total = per_epoch * cfg.train.epochs
    total = min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total

    ds_config = build_ds_config(cfg, world, text_hidden_size(cfg.model))
    universal = None
    if point is not None and point.world != world:
        ds_config["checkpoint"] = reshard.ds_config_entry()  # the engine must be built knowing it loads universal
        universal = reshard.prepare(point)
    reference = build_reference(cfg, ds_config, chat, dataset, blank)  # first: a bad cache fails before weights load
    engine, client_optimizer = build_policy(cfg, ds_config, total, blank)
    layout, why = choose_layout(cfg.loss.scoring, engine.module.model)
    dist.print0(why)
    collate = make_collate(layout, pad_id, cfg.train.max_tokens_per_sequence)
    ref_kind = "none (sft)" if cfg.loss.type == "sft" else "cache" if cfg.train.ref_cache else "live copy"
    if reference is None and cfg.loss.type != "sft":
        reference, ref_kind = AdapterOffReference(engine, cfg.loss.reduction), "policy with adapters off"
    dist.print0(f"world={world} micro_batch={cfg.train.micro_batch_size} grad_accum={cfg.train.grad_accum} "
                f"global_batch={ds_config['train_batch_size']} examples, steps/epoch={per_epoch}, total steps={total}, "
                f"reference={ref_kind}")

    start = 0
    if point is not None:
        start = checkpoint.load(engine, point, universal)
        apply_optim_config(engine, ds_config, cfg.optim)
        moved = optim.repage_states(client_optimizer) if client_optimizer is not None else 0
        dist.print0(f"resumed from step {start} ({point.path})" + (f"; {moved} optimizer states back in paged "
                                                                   f"memory" if moved else ""))

    if start >= total:
        dist.print0(f"run in {cfg.train.output_dir} is already complete ({total} steps); nothing to do")
        log.close()
        return 0
    stop_request = StopRequest(cfg.train.output_dir)
    log.start(total, initial_step=start)
    last_saved = start if point is not None else None  # the newest checkpoint with finite weights
    bad_steps = 0  # consecutive steps with a non-finite loss or gradient norm
    engine.train()
    t_last, cpu_last = time.time(), time.process_time()
    for step in range(start, total):
        epoch, step_in_epoch = divmod(step, per_epoch)
        sums = {}
        lr = engine.get_lr()[0]
        for indices in sampler.micro_batches(len(dataset), cfg.train.seed, epoch, step_in_epoch,
                                             cfg.train.micro_batch_size, cfg.train.grad_accum, world, rank):
            batch = collate([dataset[i] for i in indices])
            inputs = model_inputs(batch, engine.device)
            mask = response_mask(inputs["labels"])  # (R, T-1)
            # Reference first: its no-grad forward then never runs beside the policy's saved activations.
            ref_logps = reference(batch, inputs) if reference is not None else None  # (R,)
            loss, metrics = preference_loss(engine(**inputs), mask, ref_logps, batch, cfg.loss)
            loss, metrics = add_router_aux(loss, metrics, engine.module, cfg.loss.router_aux_coef)
            loss = maybe_poison(loss, step + 1)
            engine.backward(loss)
            engine.step()  # DeepSpeed applies the optimizer only on the last micro-step of the accumulation
            metrics["tokens"] = inputs["attention_mask"].sum()  # tokens the forward computes, padding excluded
            metrics["positions"] = torch.tensor(float(inputs["input_ids"].numel()), device=engine.device)  # + padding
            for k, v in metrics.items():  # stays on the device: no sync per micro-step
                sums[k] = sums.get(k, 0.0) + v.detach().double()
        sums["stop"] = stop_request.flag()

        # One all-reduce per optimizer step: the only CPU-GPU sync in the loop. It also tells every rank whether
        # any was asked to stop.
        totals = dist.sum_across_ranks(sums)
        stopping = float(totals.pop("stop")) > 0 and step + 1 < total
        metrics = finalize_metrics({k: v for k, v in totals.items() if k not in ("tokens", "positions")})
        now, cpu_now = time.time(), time.process_time()
        # ZeRO-3 finds a non-finite gradient norm itself, skips the update (weights and schedule stay as they were)
        # and reports the norm as inf; fp32/bf16 have no loss scale to lower, so the next step is as likely to fail.
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        metrics.update(lr=lr, grad_norm=grad_norm, epoch=epoch, start=start_n,
                       tokens=float(totals["tokens"]), positions=float(totals["positions"]), step_time=now - t_last,
                       peak_mem_mb=peak_memory_mb(), cpu_time=cpu_now - cpu_last)  # cpu_time: this rank's, all threads
        t_last, cpu_last = now, cpu_now
        log.log(step + 1, metrics)
        # Every rank sees the same all-reduced loss and global norm, so every rank takes the same branch.
        bad_steps = bad_steps + 1 if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)) else 0
        if cfg.train.max_bad_steps and bad_steps >= cfg.train.max_bad_steps:
            diverged(cfg, step + 1, bad_steps, last_saved, log)
        # No checkpoint during a streak: it would rotate out the last one from before it.
        in_streak = cfg.train.max_bad_steps and bad_steps
        if not in_streak and (stopping or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0
                                           and step + 1 < total)):
            checkpoint.save(engine, cfg.train.output_dir, step + 1, cfg.train.keep_checkpoints)
            last_saved = step + 1
        maybe_crash("train_steps", step + 1)
        if stopping:
            stop_request.clear()
            log.close()
            dist.barrier()
            saved = (f"saved {checkpoint.checkpoint_root(cfg.train.output_dir)}/step_{last_saved}" if last_saved
                     else "no checkpoint saved yet")  # last_saved < step + 1: stopped within a non-finite streak
            dist.print0(f"stopped on request after step {step + 1} of {total}: {saved}; resume with --resume")
            return STOPPED_EXIT_CODE

    checkpoint.save(engine, cfg.train.output_dir, total, cfg.train.keep_checkpoints)
    stop_request.clear()  # a request that came with the last step: the run is complete, nothing to stop
    log.close()
    if cfg.train.export_16bit:
        def export_model():
            # From the checkpoint just written, streaming, in the model class's key names: loads with from_pretrained.
            # A LoRA run writes its adapter directory, or with lora.export=merged full weights with the adapters
            # folded in. At 70B this is ~140 GB written by one process: longer than a collective may wait.
            maybe_slow("export")
            export(checkpoint.checkpoint_root(cfg.train.output_dir), os.path.join(cfg.train.output_dir, "hf_model"),
                   dtype=cfg.model.dtype, base_model=cfg.model.path, force=True,
                   merge=lora.uses_adapters(cfg.model) and cfg.lora.export == "merged")

        dist.on_rank0_polled(export_model, os.path.join(cfg.train.output_dir, "export"), "to export the model")
    dist.barrier()
    dist.print0(f"done: {total} steps, run directory {cfg.train.output_dir}")
    return 0


def diverged(cfg, step, bad_steps, last_saved, log):
    """Stop a run whose loss or gradient norm has been non-finite for `bad_steps` steps up to `step`: keep its last
    finite checkpoint out of rotation, export nothing, raise Diverged (exit 1) on every rank."""
    root = checkpoint.checkpoint_root(cfg.train.output_dir)
    first = step - bad_steps + 1
    if last_saved is not None and dist.is_rank0():
        checkpoint.pin(cfg.train.output_dir, last_saved,
                       f"last finite checkpoint before the divergence at step {first}")
    log.close()
    dist.barrier()
    kept = (f"the last finite checkpoint, {root}/step_{last_saved}, is kept out of rotation (remove its `pinned` "
            f"file to let it go)" if last_saved is not None else "no checkpoint was saved before it")
    raise Diverged(f"training diverged: loss or gradient norm not finite for {bad_steps} consecutive steps "
                   f"(train.max_bad_steps), steps {first}-{step}; {kept}. Nothing was exported. Lower optim.lr or "
                   f"check the data, then resume from it with --resume (and --allow-change for what you changed).")


def main(argv=None):
    args = parse_args(argv)
    return train(load_config(args.config, args.overrides))


if __name__ == "__main__":
    cli.run(main)
