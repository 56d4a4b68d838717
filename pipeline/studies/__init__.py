"""What the stages run on top of training and evaluation: evaluation runs of a checkpoint, ablation
grids, activation maps, the figures and words of a report, and the demo that runs them all.
"""

from pipeline.studies.ablation import GridPoint, TrainSettings, run_grid
from pipeline.studies.demo import run_demo
from pipeline.studies.demo_plan import DemoError
from pipeline.studies.demo_report import DemoFacts
from pipeline.studies.eval_run import EvalError
from pipeline.studies.report import save_figure
from pipeline.studies.visualize import FrameSource, render

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
