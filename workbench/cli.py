"""`workbench ...`: the headless front end. Argument parsing and printing only; the library does the work.

    workbench prepare-demo                       # extract and cache the embedded demo model
    workbench eval --model demo --suite quick    # baseline run, prints a table
    workbench run --model demo --technique rtn --param bits=3 --param group_size=64
    workbench sweep --model demo --technique rtn --bits 2 3 4 8
    workbench sweep --model demo --technique bnb --bits 8 4    # 8 -> int8, 4 -> nf4 (the technique's space)
    workbench sweep examples/sweeps/quant-grid.yaml --dry-run  # a sweep file: models x pipelines x suites
    workbench techniques [rtn]                   # what exists; one technique's fields with their help
    workbench run --help-technique rtn           # the same field list
    workbench runs --technique rtn --format md   # list / filter / export the registry
    workbench distill-rank --model demo --candidate drop=4 --candidate ffn=768 --steps 20   # ranked students
    workbench fit 12 --context 8192 --batch 4 --kv q8_0   # memory, devices it fits, larger sizes of it
    workbench export 12 --format compressed-tensors --out out/ct   # run 12's variant as files + README.md card
    workbench registry upgrade --url sqlite:///workbench-runs.db
    workbench lab [--dashboard]                  # JupyterLab (or a Voila dashboard) on notebooks/

Bad input prints one line to stderr and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import secrets
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from workbench.errors import ConfigError, WorkbenchError
from workbench.runtimes.exporting import EXPORT_FORMATS

SHOWN_METRICS = (
    "ppl",
    "kl_mean",
    "kl_p99",
    "top1_agree",
    "bits_per_weight",
    "size_mb",
    "prefill_tok_s",
    "decode_tok_s",
    "peak_mem_mb",
)


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def _params(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--param {pair!r} must look like name=value, e.g. --param bits=4.")
        key, value = pair.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


def _suite(args: argparse.Namespace) -> Any:
    from workbench.evaluate import get_suite

    suite = get_suite(args.suite)
    text = getattr(args, "text", None)
    if text:
        if not Path(text).is_file():
            raise ConfigError(f"--text {text}: no such file. Give a path to a UTF-8 text file.")
        suite = dataclasses.replace(suite, corpus=str(Path(text).resolve()))
    return suite


class _Bar:
    """A tqdm bar fed by the library's progress callback."""

    def __init__(self, desc: str) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=1000, desc=desc, leave=False, file=sys.stderr, bar_format="{l_bar}{bar}| {postfix}"
        )

    def __call__(self, fraction: float, message: str) -> None:
        self._bar.n = int(fraction * 1000)
        self._bar.set_postfix_str(message[:40], refresh=True)

    def close(self) -> None:
        self._bar.close()


def _workspace(args: argparse.Namespace) -> Any:
    """The workspace a command runs in: the suite is resolved first, so a bad one fails before the registry opens."""
    from workbench.workspace import Workspace

    suite = _suite(args)
    return Workspace(args.registry, model=args.model, suite=suite)


def _run_one(ws: Any, args: argparse.Namespace, pipeline: list[Any]) -> Any:
    bar = _Bar("run")
    try:
        return ws.run_now(
            pipeline, progress=bar, tags=tuple(args.tag or ()), notes=args.notes or "", reuse=not args.force
        )
    finally:
        bar.close()


def _print_results(results: Sequence[Any], fmt: str = "md") -> int:
    import pandas as pd

    from workbench.export import export_frame

    rows = []
    for res in results:
        row: dict[str, Any] = {"run": res.run_id, "pipeline": res.label, "status": res.status}
        row.update({k: res.metrics.get(k) for k in SHOWN_METRICS if k in res.metrics})
        if res.reused:
            row["status"] = "done (from registry)"
        rows.append(row)
    print(export_frame(pd.DataFrame(rows), fmt))
    failed = [r for r in results if r.status != "done"]
    for res in failed:
        print(f"run {res.run_id} {res.status}: {res.error}", file=sys.stderr)
    return 1 if failed else 0


def cmd_eval(args: argparse.Namespace) -> int:
    with _workspace(args) as ws:
        return _print_results([_run_one(ws, args, [])])


def cmd_run(args: argparse.Namespace) -> int:
    from workbench.techniques import make_config

    if args.help_technique:
        print(technique_help(args.help_technique))
        return 0
    if not args.technique:
        raise ConfigError("run needs --technique NAME (e.g. rtn); `workbench techniques` lists them.")
    pipeline = [make_config(args.technique, **_params(args.param or ()))]
    with _workspace(args) as ws:
        return _print_results([_run_one(ws, args, pipeline)])


def _flag_sweep(args: argparse.Namespace) -> Any:
    """``--model M --technique T --bits ...`` as a one-line sweep: the technique's parameter space at those
    widths (all of them, widest first, without --bits), the other settings fixed."""
    from workbench.sweep import Sweep

    params = _params(args.param or ())
    if "bits" in params:
        raise ConfigError("sweep: give the widths with --bits, not --param bits=...")
    step = {"bits": list(args.bits) if args.bits else "all", **params}
    data = {"models": [args.model or "demo"], "suites": [_suite(args)], "pipelines": [{args.technique: step}]}
    return Sweep.from_dict(data, source="", keys=False)


def cmd_sweep(args: argparse.Namespace) -> int:
    """A sweep file (models x pipelines x suites, see workbench/sweep.py), or the flag form: one run per bit
    width through the technique's parameter space (bnb's 8 and 4 bits are int8 and nf4; the default point is
    the one the Quantize panel starts at for this model). Both run through ``run_sweep``."""
    from workbench.sweep import Sweep, run_sweep

    if args.file and args.technique:
        raise ConfigError("sweep: give a sweep file or --technique, not both.")
    suite_given = bool(args.suite or args.text)
    args.suite = args.suite or "quick"
    if args.file:
        if args.bits or args.param:
            raise ConfigError(
                "sweep: --bits and --param belong to the flag form; write them in the sweep file."
            )
        sweep = Sweep.from_yaml(args.file)
        if args.model:
            sweep = sweep.replace(models=[args.model])
        if suite_given:
            sweep = sweep.replace(suites=[_suite(args)])
    elif args.technique:
        sweep = _flag_sweep(args)
    else:
        raise ConfigError(
            "sweep needs a sweep file (e.g. examples/sweeps/quant-grid.yaml) or --technique NAME --bits ..."
        )
    if args.tag or args.notes:
        sweep = sweep.replace(tags=(*sweep.tags, *(args.tag or ())), notes=args.notes or sweep.notes)
    export = None
    if args.export:
        from workbench.export import EXPORT_FORMATS

        export = Path(args.export).suffix.lstrip(".").lower()
        if export not in EXPORT_FORMATS:
            raise ConfigError(
                f"--export {args.export}: name a file ending in .{', .'.join(EXPORT_FORMATS)} (the format)."
            )
    bar: Any = None

    def start(n: int) -> None:
        nonlocal bar
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="dry run" if args.dry_run else "sweep", unit="run", file=sys.stderr)

    def step(item: Any, _i: int, _n: int) -> None:
        if bar is not None:
            bar.set_postfix_str(item.configuration.label[:40], refresh=False)
            bar.update(1)

    try:
        report = run_sweep(
            sweep,
            registry=args.registry,
            executor=args.executor,
            address=args.address,
            dry_run=args.dry_run,
            force=args.force,
            max_retries=args.max_retries,
            on_start=start,
            on_result=step,
        )
    finally:
        if bar is not None:
            bar.close()
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.dry_run:
        from workbench.export import export_frame

        plan = report.plan()
        print(export_frame(plan, "md"))
        if export:
            export_frame(plan, export, path=args.export)
            print(f"wrote the plan of {len(plan)} configuration(s) to {args.export}", file=sys.stderr)
        print(report.summary(), file=sys.stderr)
        return 0
    from workbench.tables import export_table

    table = report.table()
    if table.empty:  # nothing recorded where the report looks (a runner that records elsewhere)
        from workbench.export import export_frame

        print(export_frame(report.plan(), "md"))
    else:
        print(export_table(table, "md"))
        if export:
            export_table(table, export, path=args.export)
            print(f"wrote {len(table)} run(s) to {args.export}", file=sys.stderr)
    for item in report.failed:
        print(f"run {item.run_id} {item.status}: {item.configuration.label}: {item.error}", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    return 1 if report.failed else 0


def technique_help(name: str) -> str:
    """One technique's fields (default and help text) and the widths a sweep or slider offers."""
    from workbench.techniques import get_technique
    from workbench.techniques.space import field_help, parameter_space

    tech = get_technique(name)
    lines = [f"{name} ({tech.kind}): {tech.summary}", ""]
    for f in field_help(name):
        lines.append(f"  {f.name} ({f.type}, default {f.default!r})")
        if f.help:
            lines.append(f"      {f.help}")
    try:
        space = parameter_space(name)
    except ConfigError:
        return "\n".join(lines)
    lines += ["", f"  sweep --bits: {space.widths_text()}"]
    if space.group_sizes:
        lines.append(
            "  group sizes offered: "
            + ", ".join("per-channel" if g == -1 else str(g) for g in space.group_sizes)
            + " (a loaded model narrows these to the ones every layer takes)"
        )
    return "\n".join(lines)


def cmd_techniques(args: argparse.Namespace) -> int:
    from workbench.techniques import get_technique, technique_names
    from workbench.techniques.space import parameter_space, space_names

    if args.name:
        print(technique_help(args.name))
        return 0
    spaced = set(space_names())
    for name in technique_names():
        tech = get_technique(name)
        widths = f" [bits: {parameter_space(name).widths_text()}]" if name in spaced else ""
        print(f"{name:10s} {tech.kind:9s} {tech.summary}{widths}")
    print("\nFields and their help: workbench techniques NAME", file=sys.stderr)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from workbench.export import export_frame
    from workbench.registry import Registry

    if args.action == "copy":
        return cmd_runs_copy(args)
    if args.source or args.destination:
        raise ConfigError("--from and --to belong to `workbench runs copy --from URL --to URL`.")
    status = args.status or "done"
    reg = Registry.open(args.registry)
    frame = reg.runs_frame(
        model=args.model_fingerprint,
        status=None if status == "all" else status,
        technique=args.technique,
        tag=args.tag,
    )
    if args.columns:
        missing = [c for c in args.columns if c not in frame.columns]
        if missing:
            raise ConfigError(f"Unknown column(s) {', '.join(missing)}. Columns: {', '.join(frame.columns)}.")
        frame = frame[list(args.columns)]
    elif args.format in ("md", "html", "tex"):  # for people: the Compare panel's table (workbench.tables)
        from workbench.tables import DEFAULT_COLUMNS, comparison_table, export_table

        table = comparison_table(frame, columns=["run_id", "status", *DEFAULT_COLUMNS[1:], "suite"])
        if not table.empty:
            text = export_table(table, args.format, path=args.output)
            print(f"wrote {len(table)} run(s) to {args.output}" if args.output else text)
            return 0
    if frame.empty and not args.output:
        print("No runs match. Record one with: workbench eval --model demo", file=sys.stderr)
        return 0
    text = export_frame(frame, args.format, path=args.output)
    if args.output:
        print(f"wrote {len(frame)} run(s) to {args.output}")
    else:
        print(text)
    return 0


def cmd_runs_copy(args: argparse.Namespace) -> int:
    """`workbench runs copy --from URL --to URL [filters]`: workbench.registry.copy_runs, printed in one line."""
    from workbench.registry import copy_runs

    if not args.destination:
        raise ConfigError("runs copy needs --to URL, e.g. --to postgresql+psycopg://user@host/runs.")
    status = None if args.status in (None, "all") else args.status
    report = copy_runs(
        args.source or args.registry,
        args.destination,
        model=args.model_fingerprint,
        technique=args.technique,
        tag=args.tag,
        status=status,
    )
    print(report)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    """Memory of a run's variant (or of a model's config at --bits) at a context and batch, the device sizes
    that hold it, and the same precision at other sizes of its family (workbench/fit.py)."""
    from workbench.fit import architecture_for, parse_devices, plan_fit, report

    settings: dict[str, Any] = {
        "context": args.context,
        "batch": args.batch,
        "kv_dtype": args.kv,
        "devices_gb": parse_devices(",".join(args.devices)),
        "flash_attention": not args.no_flash_attention,
    }
    if args.run_id is not None:
        from workbench.registry import Registry

        with Registry.open(args.registry) as reg:
            run = reg.get_run(args.run_id)
        plan = plan_fit(run, arch=architecture_for(args.model) if args.model else None, **settings)
    elif args.model:
        plan = plan_fit(architecture_for(args.model), weight_bits=args.bits, **settings)
    else:
        raise ConfigError(
            "fit needs a RUN_ID (`workbench runs` lists them) or --model M (e.g. demo, Llama-2-7B)."
        )
    print(report(plan, args.format, extrapolation=not args.no_extrapolate))
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from workbench.registry import Registry, safe_url

    if args.action == "upgrade":
        schema = Registry.upgrade(args.url)
        print(f"Registry at {safe_url(args.url)} is up to date (schema {schema}; runs kept).")
    return 0


# `workbench export --format NAME`: the formats are workbench.runtimes.exporting.EXPORT_FORMATS (a new format is
# one entry there); the Deploy tab exports through the same export_run.
def cmd_export(args: argparse.Namespace) -> int:
    """Rebuild a recorded run's variant, export it, write its model card beside the files, say what was written."""
    from workbench.registry import Registry
    from workbench.runtimes.exporting import export_run

    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; give a new folder.")
    with Registry.open(args.registry) as reg:
        run = reg.get_run(args.run_id)
        bar = _Bar(f"export run {run.id}")
        try:
            done = export_run(run, args.format, out, registry=reg, model=args.model, progress=bar)
        finally:
            bar.close()
    info = done.info
    print(f"Exported run {run.id} ({run.pipeline_label}) as {info.format} to {out}:")
    for name, size in done.sizes.items():
        print(f"  {name}  ({size / 1e6:.2f} MB)")
    check = done.reload_check
    if check is not None:
        diff = info.details.get("reload_max_abs_logit_diff")
        print(f"Reloaded through transformers: {check} (max |logit difference| {diff:.3g}).")
    for note in info.notes:
        print(f"note: {note}", file=sys.stderr)
    return 1 if check == "FAILED" else 0


def cmd_distill_rank(args: argparse.Namespace) -> int:
    """Several student shapes, the same short distillation each, ranked (workbench.distill.candidates)."""
    from workbench.distill.candidates import (
        RankConfig,
        check_budget,
        default_candidates,
        parse_candidate,
        rank_candidates,
    )
    from workbench.techniques import make_config

    check_budget(args.steps, args.tokens)  # before the model loads
    distill = make_config("distill", **_params(args.param or ()))
    shapes = tuple(parse_candidate(text) for text in args.candidate or ())
    with _workspace(args) as ws:
        config = RankConfig(
            candidates=shapes or default_candidates(ws.load().model),
            steps=args.steps,
            tokens=args.tokens,
            distill=distill,
            rank_by=args.rank_by,
        )
        bar = _Bar("rank candidates")
        try:
            ranking = rank_candidates(
                ws, config, progress=bar, tags=tuple(args.tag or ()), reuse=not args.force
            )
        finally:
            bar.close()
    print(ranking.table(args.format))
    print(ranking.summary(), file=sys.stderr)
    return 0


def cmd_prepare_demo(args: argparse.Namespace) -> int:
    from workbench.models import prepare_demo

    print(prepare_demo())
    return 0


def lab_token(given: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The token ``workbench lab`` protects its server with: ``--token``, else ``$WORKBENCH_TOKEN``, else a new
    random one. A fixed, documented default would let any local process or web page that knows it run code in
    the kernels; an empty token (which Jupyter reads as "no authentication") counts as none given."""
    env = os.environ if environ is None else environ
    return given or env.get("WORKBENCH_TOKEN") or secrets.token_urlsafe(24)


def cmd_lab(args: argparse.Namespace) -> int:
    root = Path(args.notebooks).resolve()
    if not root.is_dir():
        raise ConfigError(f"No notebooks folder at {root}. Run from the repository root or pass --notebooks.")
    env = dict(os.environ)
    # Kernels start in the notebooks folder; without this, runs recorded there and runs recorded by `workbench`
    # commands in this folder would land in two different default registries.
    env.setdefault("WORKBENCH_REGISTRY", f"sqlite:///{Path.cwd() / 'workbench-runs.db'}")
    print(f"Registry: {env['WORKBENCH_REGISTRY']}", flush=True)
    token = lab_token(args.token)
    if args.dashboard:
        # port_retries=0: a busy port fails with the server's message instead of moving to another port than the
        # URL printed below.
        cmd = [
            sys.executable,
            "-m",
            "voila",
            str(root / args.notebook),
            "--no-browser",
            f"--port={args.port}",
            "--Voila.ip=127.0.0.1",
            "--Voila.port_retries=0",
            f"--token={token}",
            "--strip_sources=True",
        ]
        url = f"http://127.0.0.1:{args.port}/?token={token}"
    else:
        cmd = [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            f"--notebook-dir={root}",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={args.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        url = f"http://127.0.0.1:{args.port}/lab?token={token}"
    print(f"Efficiency Workbench: open {url}", flush=True)
    return subprocess.call(cmd, env=env)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (what was wrong, where to look), as every other error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description="Shrink a language model and see what it costs.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="demo", help="demo, a Hugging Face id, a folder or a .gguf file")
        p.add_argument("--suite", default="quick", help="quick (seconds) or standard (~20k tokens)")
        p.add_argument("--text", help="evaluate on this local text file instead of the suite's corpus")
        p.add_argument(
            "--registry",
            default=None,
            help="SQLAlchemy URL (default $WORKBENCH_REGISTRY or ./workbench-runs.db)",
        )
        p.add_argument("--tag", action="append", help="tag the run (repeatable)")
        p.add_argument("--notes", default="", help="free-text notes stored with the run")
        p.add_argument("--force", action="store_true", help="recompute even if the registry has this run")

    p = sub.add_parser("eval", help="evaluate the unmodified model (a baseline run)")
    common(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("run", help="apply one technique and evaluate")
    common(p)
    p.add_argument("--technique", help="e.g. rtn, gptq, awq, bnb, quanto (`workbench techniques` lists them)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="technique parameter (repeatable)")
    p.add_argument(
        "--help-technique", metavar="NAME", help="list the technique's fields with their help and exit"
    )
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser(
        "sweep", help="run a sweep file (models x pipelines x suites), or a technique at several bit widths"
    )
    common(p)
    p.set_defaults(model=None, suite=None)  # with a file, the file's unless given here
    p.add_argument("file", nargs="?", help="a sweep file (YAML; examples/sweeps/ has examples)")
    p.add_argument("--technique", help="the flag form: one technique at several bit widths")
    p.add_argument(
        "--bits",
        type=int,
        nargs="+",
        default=None,
        help="bit widths (default: every width the technique takes, widest first)",
    )
    p.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="fixed for every run, e.g. group_size=64 or symmetric=true",
    )
    p.add_argument("--dry-run", action="store_true", help="list what would run and what the registry has")
    p.add_argument("--executor", default="local", choices=["local", "ray"], help="local: one run at a time")
    p.add_argument(
        "--address", default=None, help="the Ray cluster to join (default: start a local instance)"
    )
    p.add_argument("--max-retries", type=int, default=2, help="ray: retries of a task whose worker was lost")
    p.add_argument(
        "--export", metavar="FILE", help="also write the table to FILE (.csv .md .html .tex .json)"
    )
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("techniques", help="list techniques, or one technique's fields with their help")
    p.add_argument("name", nargs="?")
    p.set_defaults(fn=cmd_techniques)

    p = sub.add_parser("runs", help="list, filter and export recorded runs; `runs copy` copies them")
    p.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=["list", "copy"],
        help="list (default), or copy --from URL --to URL: the matching runs with their lineage, never twice",
    )
    p.add_argument("--registry", default=None)
    p.add_argument("--from", dest="source", default=None, help="copy: the registry to copy from (--registry)")
    p.add_argument("--to", dest="destination", default=None, help="copy: the registry to copy into")
    p.add_argument(
        "--status",
        default=None,
        choices=["done", "failed", "interrupted", "running", "all"],
        help="list: default done; copy: default every finished run (running runs are never copied)",
    )
    p.add_argument("--technique")
    p.add_argument("--tag")
    p.add_argument("--model-fingerprint", default=None)
    p.add_argument("--columns", nargs="+")
    p.add_argument("--format", default="md", choices=["csv", "md", "html", "tex", "json"])
    p.add_argument("--output", help="write to this file instead of printing")
    p.set_defaults(fn=cmd_runs)

    p = sub.add_parser("fit", help="memory at a context and batch, the devices that hold it, other sizes")
    p.add_argument("run_id", nargs="?", type=int, metavar="RUN_ID", help="a recorded run (`workbench runs`)")
    p.add_argument(
        "--model",
        default=None,
        help="demo, a model folder, a downloaded Hugging Face id or a reference config (Llama-2-7B); "
        "with RUN_ID: the architecture of the run's model",
    )
    p.add_argument("--registry", default=None)
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences served at once (default 1)")
    p.add_argument(
        "--kv",
        default="f16",
        choices=["f16", "bf16", "q8_0", "q4_0", "f32"],
        help="KV cache type (default f16)",
    )
    p.add_argument("--devices", nargs="+", default=["8", "16", "24", "80"], help="device sizes in GB")
    p.add_argument("--bits", type=float, default=16.0, help="bits per weight of a --model without a run")
    p.add_argument(
        "--no-flash-attention",
        action="store_true",
        help="count the attention scores llama.cpp keeps without flash attention",
    )
    p.add_argument("--no-extrapolate", action="store_true", help="only the variant, not other sizes")
    p.add_argument("--format", default="md", choices=["md", "csv", "html", "json"])
    p.set_defaults(fn=cmd_fit)

    p = sub.add_parser("registry", help="registry maintenance")
    p.add_argument("action", choices=["upgrade"])
    p.add_argument("--url", default=None)
    p.set_defaults(fn=cmd_registry)

    p = sub.add_parser(
        "distill-rank", help="distil several student shapes with the same short budget and rank them"
    )
    common(p)
    p.add_argument(
        "--candidate",
        action="append",
        metavar="SHAPE",
        help="a student shape, e.g. 'drop=4', 'ffn=768', 'drop=2 ffn=1152' (repeatable; default: drop 2/4/6 "
        "of 30 layers and FFN 75%%/50%%, scaled to the model)",
    )
    p.add_argument("--steps", type=int, default=20, help="distillation steps every candidate gets")
    p.add_argument("--tokens", type=int, default=0, help="training tokens every candidate gets (0: steps)")
    p.add_argument(
        "--param", action="append", metavar="NAME=VALUE", help="distill setting, e.g. loss=forward_kl"
    )
    p.add_argument(
        "--rank-by", default="quality_per_param", choices=["quality_per_param", "recovered_per_param", "ppl"]
    )
    p.add_argument("--format", default="md", choices=["csv", "md", "html", "tex", "json"])
    p.set_defaults(fn=cmd_distill_rank)

    p = sub.add_parser("prepare-demo", help="extract the embedded demo model and cache a safetensors copy")
    p.set_defaults(fn=cmd_prepare_demo)

    p = sub.add_parser("export", help="export a recorded run's variant to a folder, with its model card")
    p.add_argument("run_id", type=int, metavar="RUN_ID")
    p.add_argument("--format", required=True, choices=sorted(EXPORT_FORMATS))
    p.add_argument("--out", required=True, metavar="FOLDER", help="a new (or empty) folder to write")
    p.add_argument(
        "--model",
        default="demo",
        help="the model the run was recorded on (the registry keeps its fingerprint, which is checked)",
    )
    p.add_argument("--registry", default=None, help="SQLAlchemy URL (default $WORKBENCH_REGISTRY)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("lab", help="open the workbench in JupyterLab (or as a dashboard)")
    p.add_argument("--dashboard", action="store_true", help="serve the app alone with Voila")
    p.add_argument("--notebooks", default="notebooks")
    p.add_argument(
        "--notebook", default="dashboard.ipynb", help="the notebook --dashboard serves (the app alone)"
    )
    p.add_argument("--port", type=int, default=int(os.environ.get("WORKBENCH_PORT", "8888")))
    p.add_argument(
        "--token", default=None, help="the URL's token (default $WORKBENCH_TOKEN, else a new random one)"
    )
    p.set_defaults(fn=cmd_lab)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
