from .ablation import GridPoint, TrainSettings, run_grid
from .demo import run_demo
from .demo_plan import DemoError
from .demo_report import DemoFacts
from .eval_run import EvalError
from .report import save_figure
from .visualize import FrameSource, render

__all__ = [
    "DemoError",
    "DemoFacts",
    "EvalError",
    "FrameSource",
    "GridPoint",
    "TrainSettings",
    "render",
    "run_demo",
    "run_grid",
    "save_figure",
]
