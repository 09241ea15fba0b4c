"""Distillation on the demo model: training speed per teacher path, and recovery of a pruned student over time.

Run: ``.venv/bin/python bench/distill.py [--threads 2] [--minutes 2,5,10] [--speed-steps 4] [--device cpu]``

The student is the demo model (SmolLM2-135M-Instruct, 30 layers) with the 4 layers of least Block Influence
dropped (ranked on calibration text). Two parts, each measured in this one process:

1. **Training tokens/s** of that student with the live teacher, the top-k store (k=64) and the sampled store
   (12 draws), each in fp32 and with bf16 autocast; ``--speed-steps`` optimizer steps of batch 4 × 256 after one
   warm-up step. The stores' one-off build time is printed beside them (it is paid once per text and reused).
   Target: the stored-logit path at ≥ 1.5x the live teacher's tokens/s.
2. **Recovery**: perplexity on the evaluation part (``--eval-chunks`` chunks of 512, every position after the
   first, fp32) of the teacher, of the untrained student, and of the student after each of ``--minutes`` of
   training: KD from the top-k store (forward KL, T=1, alpha 0.5) and the hard-label baseline on the same batches
   (same seed). Each is one run with the last budget; the earlier marks are snapshots of its weights taken
   during that run (the cosine schedule spans the whole budget). Targets: KD below hard labels at every mark;
   after 10 minutes the student within 1.2x the teacher's perplexity; the stored-logit path's final perplexity
   within 2% of the live teacher's (``--live-recovery`` runs that third leg too; it doubles the time).

Prints ratios measured in this run; ``docs/distillation.md`` keeps what was measured.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time
from pathlib import Path

import torch


def windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


@torch.no_grad()
def perplexity(model, chunks: torch.Tensor, device: str) -> float:
    model.eval()
    total, count = 0.0, 0
    for chunk in chunks:
        logits = model(chunk[None].to(device), use_cache=False).logits[0].float()
        nll = torch.nn.functional.cross_entropy(logits[:-1], chunk[1:].to(device), reduction="sum")
        total, count = total + float(nll), count + chunk.numel() - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--minutes", default="2,5,10", help="recovery marks, minutes of training (comma list)"
    )
    parser.add_argument("--speed-steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-chunks", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--drop", type=int, default=4)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--live-recovery", action="store_true", help="also train KD with the live teacher")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault(
        "WORKBENCH_HOME", str(Path(__file__).resolve().parents[1] / ".cache" / "workbench-home")
    )

    from workbench.corpus import get_corpus
    from workbench.distill import block_influence, build_store, drop_layers, layers_to_drop, n_parameters
    from workbench.distill.train import TrainSettings, train_student
    from workbench.models import load_model
    from workbench.progress import Progress
    from workbench.techniques import ApplyContext
    from workbench.techniques._calibration import calibration_ids

    loaded = load_model("demo")
    teacher = loaded.model.to(args.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    tok, corpus = loaded.tokenizer, get_corpus("python-docs")
    ids = calibration_ids(ApplyContext(tokenizer=tok, corpus=corpus), 8, 256, "bench")
    influence = block_influence(teacher, ids)
    dropped = layers_to_drop(influence, args.drop)
    student0 = drop_layers(teacher, dropped)
    train = windows(tok, corpus.text("training"), args.seq_len)
    evals = windows(tok, corpus.text("evaluation"), 512)[: args.eval_chunks]
    print(
        f"teacher {n_parameters(teacher) / 1e6:.1f}M params; student drops layers {dropped} "
        f"({n_parameters(student0) / 1e6:.1f}M); {train.shape[0]} training windows of {args.seq_len}, "
        f"{evals.shape[0]} evaluation chunks of 512; {args.threads} threads on {args.device}"
    )
    root = Path(tempfile.mkdtemp(prefix="distill-bench-"))  # stores timed fresh, not read from an old run

    def store(kind: str, k: int):
        t0 = time.perf_counter()
        s = build_store(teacher, train, kind=kind, k=k, temperature=1.0, root=root)
        return s, time.perf_counter() - t0

    topk, topk_s = store("topk", 64)
    sampled, sampled_s = store("sampled", 12)
    n_tok = train.numel()
    print(
        f"stores built once: top-64 {topk_s:.1f} s ({n_tok / topk_s:.0f} tok/s, {topk.bytes_per_token} B/token), "
        f"sampled-12 {sampled_s:.1f} s ({sampled.bytes_per_token} B/token)"
    )

    if not args.skip_speed:
        print(f"\n## training tokens/s (student, batch {args.batch} x {args.seq_len})")
        speeds: dict[tuple[str, bool], float] = {}
        for bf16 in (False, True):
            for name, st in (("live", None), ("topk", topk), ("sampled", sampled)):
                student = copy.deepcopy(student0)
                settings = TrainSettings(
                    loss="forward_kl",
                    temperature=1.0,
                    alpha=0.5,
                    steps=1,
                    batch_size=args.batch,
                    lr=args.lr,
                    bf16=bf16,
                )
                train_student(student, teacher, train, settings, store=st)  # warm-up step
                settings = TrainSettings(
                    loss="forward_kl",
                    temperature=1.0,
                    alpha=0.5,
                    steps=args.speed_steps,
                    batch_size=args.batch,
                    lr=args.lr,
                    bf16=bf16,
                    seed=1,
                )
                res = train_student(student, teacher, train, settings, store=st)
                speeds[(name, bf16)] = res.tokens / res.seconds
                print(f"{name:8s} {'bf16' if bf16 else 'fp32'}: {speeds[(name, bf16)]:7.1f} tok/s")
        for bf16 in (False, True):
            tag = "bf16" if bf16 else "fp32"
            live = speeds[("live", bf16)]
            print(
                f"topk_vs_live_{tag} = {speeds[('topk', bf16)] / live:.2f}x (target >= 1.5); "
                f"sampled_vs_live_{tag} = {speeds[('sampled', bf16)] / live:.2f}x"
            )
        print(f"bf16_vs_fp32_live = {speeds[('live', True)] / speeds[('live', False)]:.2f}x")

    if not args.skip_recovery:
        marks = [float(m) for m in args.minutes.split(",") if m.strip()]
        teacher_ppl = perplexity(teacher, evals, args.device)
        untrained_ppl = perplexity(student0, evals, args.device)
        print(f"\n## recovery (perplexity on {evals.shape[0]} x 512 evaluation tokens)")
        print(f"teacher {teacher_ppl:.2f}; untrained student {untrained_ppl:.2f}")
        legs = [("kd-topk", "forward_kl", topk), ("hard", "hard", None)]
        if args.live_recovery:
            legs.append(("kd-live", "forward_kl", None))
        table: dict[str, list[float]] = {}
        for name, loss, st in legs:
            student = copy.deepcopy(student0)
            snaps: dict[float, dict[str, torch.Tensor]] = {}
            started = time.perf_counter()

            def snapshot(metrics: dict, student=student, snaps=snaps, started=started) -> None:
                if "train_loss" not in metrics:
                    return
                elapsed = (time.perf_counter() - started) / 60
                for m in marks[:-1]:
                    if m not in snaps and elapsed >= m:
                        snaps[m] = {k: v.detach().clone() for k, v in student.state_dict().items()}

            settings = TrainSettings(
                loss=loss,
                temperature=1.0,
                alpha=0.5,
                steps=0,
                seconds=marks[-1] * 60,
                batch_size=args.batch,
                lr=args.lr,
                warmup_steps=5,
            )
            res = train_student(
                student, teacher, train, settings, store=st, progress=Progress(on_partial=snapshot)
            )
            row = []
            for m in marks[:-1]:
                probe = copy.deepcopy(student0)
                if m in snaps:
                    probe.load_state_dict(snaps[m])
                row.append(perplexity(probe, evals, args.device) if m in snaps else float("nan"))
            row.append(perplexity(student, evals, args.device))
            table[name] = row
            print(
                f"{name:8s}: "
                + ", ".join(f"{m:g} min {v:.2f}" for m, v in zip(marks, row))
                + f"  ({res.tokens} tokens, {res.steps} steps, {res.tokens / res.seconds:.0f} tok/s)"
            )
        kd, hard = table["kd-topk"], table["hard"]
        wins = sum(a < b for a, b in zip(kd, hard))
        print(f"kd_beats_hard = {wins}/{len(marks)} marks (target {len(marks)}/{len(marks)})")
        print(f"kd_final_vs_teacher = {kd[-1] / teacher_ppl:.2f}x (target <= 1.2)")
        if "kd-live" in table:
            print(f"topk_final_vs_live_final = {kd[-1] / table['kd-live'][-1]:.3f} (target within 2%)")


if __name__ == "__main__":
    main()
