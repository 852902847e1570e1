"""The ``ermoe`` command: ``train``, ``eval``, ``report``, ``export``, ``study``, ``explain``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .job_errors import peer_lost, record_unexpected, report_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ermoe", description="Train and inspect eigenbasis-routed MoE models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model (defaults: ERMoE ViT-tiny on Fashion-MNIST)",
                             epilog="Any config key can be overridden: --model.moe.router=emoe --optim.epochs=5")
    p_train.add_argument("--config", help="YAML config file (see configs/)")
    p_train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest intact checkpoint (or "
                         "give RUN_DIR/checkpoints/step_N); overrides of the schedule, length and logging apply from "
                         "there, others are refused (docs/runs.md)")
    p_train.add_argument("--from-step", type=int, metavar="N", help="with --resume: from the checkpoint of step N")
    p_train.add_argument("--accept-data-change", action="store_true", help="with --resume: go on although the data "
                         "is not what the run started with (logged; docs/runs.md)")
    p_eval = sub.add_parser("eval", help="evaluate a run's latest checkpoint, rewrite metrics.json and figures; or a "
                            "Hub folder on the data its overrides name (--data.name=imagefolder --data.data_dir=...)")
    p_eval.add_argument("run_dir", help="a run directory, or a Hub folder (docs/hub.md)")
    p_eval.add_argument("--checkpoint", help="a checkpoint directory (default: the latest)")
    p_eval.add_argument("--accept-data-change", action="store_true", help="evaluate although the data is not what "
                        "the run was trained with")
    p_export = sub.add_parser("export", help="write a run's model in the Hugging Face Hub's layout with a model card "
                              "(docs/hub.md)")
    p_export.add_argument("run_dir")
    p_export.add_argument("out_dir")
    p_export.add_argument("--checkpoint", help="a checkpoint directory (default: the latest intact one)")
    p_export.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hub repository")
    p_report = sub.add_parser("report", help="print the results table and redraw figures from metrics.json")
    p_report.add_argument("run_dir")
    p_explain = sub.add_parser("explain", help="draw what each eigen router's basis directions respond to "
                               "(docs/explain.md)")
    p_explain.add_argument("run_dir")
    p_explain.add_argument("--examples", type=int, help="examples to read (default 2000 images, 64 volumes)")
    p_explain.add_argument("--split", choices=["train", "val", "test"],
                           help="default: val where the run has one, else train")
    p_explain.add_argument("--directions", type=int, default=4, help="directions drawn per expert (largest share)")
    p_study = sub.add_parser("study", help="train every method under one budget with several seeds; write the report",
                             epilog="Overrides: --seeds=[0,1] --methods=[ermoe,switch] --train.optim.epochs=2")
    p_study.add_argument("--config", help="YAML study config (keys of ermoe.study.StudyConfig)")
    p_study.add_argument("--quick", action="store_true", help="a minutes-long version (tiny model, 2 seeds)")
    p_study.add_argument("--list-methods", action="store_true",
                         help="print the methods this study would run, one line, and exit")
    args, rest = parser.parse_known_args(argv)

    from .data.download import DownloadError
    from .data.images import CorruptDatasetError, DatasetNotFoundError
    from .data.loader import DataLoaderWorkerError
    from .train import (CheckpointError, ConfigError, NonFiniteLossError, Run, RunLockedError, evaluate, load_config,
                        report, train)

    try:
        if args.command == "train":
            if args.resume:
                from .train.config import config_from_dict, config_to_dict, merge_settings, parse_overrides
                from .train.run import LOCATION
                from .train.trainer import resume_target

                if args.config:
                    raise ConfigError("--config does not apply with --resume: a run keeps its own config.yaml; "
                                      "give the settings to change as overrides (--optim.lr=...)")
                root, from_step = resume_target(args.resume, args.from_step)
                overrides = parse_overrides(rest) if rest else {}
                moved = [key for key in LOCATION if key in overrides]
                if moved:
                    raise ConfigError(f"--{moved[0]} does not apply with --resume: a run resumes where its directory "
                                      f"is ({root}); move the directory to move the run")
                base = config_to_dict(Run(root).read_config())
                cfg = config_from_dict(merge_settings(base, overrides) if overrides else base)
                train(cfg, resume=root, from_step=from_step, accept_data_change=args.accept_data_change)
            elif args.from_step is not None or args.accept_data_change:
                raise ConfigError(f"--{'from-step' if args.from_step is not None else 'accept-data-change'} "
                                  "applies with --resume RUN_DIR only")
            else:
                train(load_config(args.config, rest))
        elif args.command == "study":
            study(args, rest, argv)
        elif args.command == "eval" and (Path(args.run_dir) / "config.json").is_file():  # a Hub folder
            if args.accept_data_change:
                raise ConfigError("--accept-data-change applies to a run directory (its data fingerprint), not to a "
                                  "Hub folder")
            from .train.trainer import evaluate_pretrained
            evaluate_pretrained(args.run_dir, load_config(None, rest))
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        elif args.command == "eval":
            evaluate(args.run_dir, args.checkpoint, accept_data_change=args.accept_data_change)
        elif args.command == "export":
            from .train.export import export_run
            print(f"exported to {export_run(args.run_dir, args.out_dir, args.checkpoint, args.push_to_hub)}")
        elif args.command == "explain":
            from .train.explain import explain
            explain(args.run_dir, args.examples, args.split, args.directions)
        else:
            report(args.run_dir)
    except (ConfigError, CheckpointError, NonFiniteLossError, RunLockedError, DatasetNotFoundError,
            CorruptDatasetError, DataLoaderWorkerError, DownloadError, ValueError) as err:
        notes = "".join(f"; {note}" for note in getattr(err, "__notes__", []))  # (e.g. how the run goes on)
        report_error(args.command, f"{err}{notes}", err)
        return 1
    except OSError as err:  # a file that cannot be read or written: its path, the cause, how to go on
        from .files import os_error_text
        report_error(args.command, os_error_text(err), err)
        return 1
    except RuntimeError as err:  # a collective whose peer process is gone: named; anything else raised on
        lost = peer_lost(err)
        if lost is None:
            record_unexpected(err)
            raise
        notes = "".join(f"; {note}" for note in getattr(err, "__notes__", []))
        report_error(args.command, f"{lost}{notes}", lost)
        return 1
    except Exception as err:
        record_unexpected(err)
        raise
    return 0


def study(args, rest: list[str], argv: list[str] | None) -> None:
    import time

    from .study import kind_of, load_study_config, run_study, write_report
    from .train.checkpoint import atomic_write_text
    from .train.config import parse_overrides

    cfg = load_study_config(args.config, quick=args.quick, overrides=parse_overrides(rest) if rest else None)
    if args.list_methods:
        print(" ".join(cfg.methods))
        return
    t0 = time.perf_counter()
    results = run_study(cfg)
    command = "ermoe " + " ".join(argv if argv is not None else sys.argv[1:])
    path = (kind_of(cfg).write_report or write_report)(cfg, results, cfg.report, command, time.perf_counter() - t0,
                        lambda p, text: atomic_write_text(Path(p), text))
    print(f"report: {path}")


if __name__ == "__main__":
    sys.exit(main())
