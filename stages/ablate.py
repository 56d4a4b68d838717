"""`strm ablate`: train a grid of heads (variants x cardinalities x lambdas x tuple retention) with one seed,
evaluate every grid point on the same tasks, and write one table like the paper's Tables 2-4
(pipeline/studies/ablation.py says why it is built this way)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console

from pipeline.heads.variants import VARIANTS
from stages.common import fail, progress_bar


# Over 80 lines for its 15 option declarations; the body is under 80.
def ablate_command(
    cache: Path = typer.Option(..., "--cache", help="Feature cache folder (from `strm extract`)."),
    variants: list[str] = typer.Option(
        ["trm,ple-trm,fle-trm,ple-fle-trm,strm"],
        "--variants",
        help=f"Rows: heads variants ({', '.join(VARIANTS)}), `proto`, a trained variant with a post-training "
        "change (strm:gamma0, jnt-st-1:gamma0, strm:no-qc), or one trained with an open-set method "
        "(strm+bounded, strm+eos, strm+garbage, strm+disc). Comma-separated or repeated.",
    ),
    cardinalities: list[str] | None = typer.Option(
        None,
        "--cardinalities",
        help="Tuple cardinality sets to cross with the variants, e.g. 1,2,3,2+3. \\[default: each variant's own]",
    ),
    lambdas: list[str] | None = typer.Option(
        None,
        "--lambdas",
        help="QC loss/logit weights to cross, e.g. 0,0.1,0.5. \\[default: 0.1]",
    ),
    retain: list[str] | None = typer.Option(
        None,
        "--retain",
        help="Fractions of tuples kept to cross, e.g. 0.25,0.5,1. \\[default: 1]",
    ),
    reference: str | None = typer.Option(
        None,
        "--reference",
        help="Row label the paired differences are taken against. \\[default: the first row]",
    ),
    train_episodes: int = typer.Option(
        10_000, "--train-episodes", min=1, help="Training tasks a grid point (frozen preset; it may stop early)."
    ),
    val_every: int = typer.Option(
        500, "--val-every", min=0, help="Validate every N training tasks (best.pt is evaluated); 0 = never."
    ),
    val_episodes: int = typer.Option(500, "--val-episodes", min=1, help="Validation tasks."),
    episodes: int = typer.Option(10_000, "--episodes", min=1, help="Test tasks, the same for every row."),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the training tasks and initial weights, and of the test tasks."
    ),
    trm_dim: int | None = typer.Option(
        None,
        "--trm-dim",
        min=1,
        help="TRM's key/value width D' for every row. \\[default: 1152]",
    ),
    flops: bool = typer.Option(
        False,
        "--flops",
        help="Add each row's heads GFLOPs on one task (the grid's way/shot, "
        "1 query a class, at the cache's D) and their ratio to the reference row's.",
    ),
    out: Path = typer.Option(Path("runs/ablate"), "--out", help="Folder for the runs, evaluations and the table."),
    device: str = typer.Option(
        "auto", "--device", help="Where every row trains and is evaluated: auto (CUDA when present), cpu, cuda, cuda:N."
    ),
) -> None:
    """Train and evaluate a grid of heads on one cache; write ablation.md / .csv / .png with paired intervals."""
    from pipeline.features.cache import open_cache
    from pipeline.features.readers import CacheError
    from pipeline.runtime.distributed import resolve_device
    from pipeline.studies.ablation import TABLE, GridPoint, TrainSettings, parse_grid, run_grid
    from pipeline.training.config import TrainError
    from pipeline.training.state import TrainProgress

    console = Console(stderr=True)
    try:
        resolve_device(device)  # an unusable device is an error before any split loads
        points = parse_grid(variants, cardinalities, lambdas, retain)
        features = open_cache(cache)
        for split in ("train", "test"):
            features.views(split)
    except ValueError as err:
        fail(str(err), 2)
    except CacheError as err:
        fail(str(err))
    settings = TrainSettings(
        episodes=train_episodes,
        seed=seed,
        val_every=val_every,
        val_episodes=val_episodes,
        heads_options={"trm_dim": trm_dim} if trm_dim else {},
        device=device,
    )
    console.print(f"ablation: {len(points)} rows on {cache} -> {out}", highlight=False)
    with progress_bar(console, "{task.fields[info]}", transient=True) as bar:

        def progress_for(point: GridPoint) -> Callable[[TrainProgress], None]:
            bar_id = bar.add_task(f"train {point.label}", total=train_episodes, info="")

            def show(p: TrainProgress) -> None:
                val = f" val {p.val_accuracy:.1f}%" if p.val_accuracy is not None else ""
                bar.update(bar_id, completed=p.task, info=f"loss {p.loss:.3g}{val}")

            return show

        try:
            outcome = run_grid(
                points,
                features,
                out,
                settings,
                episodes=episodes,
                eval_seed=seed,
                reference=reference,
                flops=flops,
                log=lambda m: console.print(m, highlight=False),
                train_progress=progress_for,
            )
        except (TrainError, ValueError) as err:
            fail(str(err), 2)
        except CacheError as err:
            fail(str(err))
    console.print((out / TABLE).read_text(), highlight=False, markup=False)
    console.print("wrote " + ", ".join(map(str, outcome.written)), highlight=False)


def register(app: typer.Typer) -> None:
    """Add `strm ablate` to the app."""
    app.command("ablate", help=ablate_command.__doc__)(ablate_command)
