"""Data layer: tasks (problem sources with held-out splits) and prompt templates.

Pure leaves: no Ray, no actors, no model. Importing this package registers every task family;
the registry's order is the order config errors list the task names in.
"""

# isort: off
from rlsys.data.tasks import TASKS, DataError, Problem, Task, make_task, register_task
from rlsys.data.arithmetic import ArithmeticTask
from rlsys.data.reasoning_gym import ReasoningGymTask
from rlsys.data.humaneval import HumanEvalTask, load_humaneval
from rlsys.data.champ import ChampTask, load_champ
from rlsys.data.asdiv import AsdivTask, load_asdiv
from rlsys.data.files import FileTask, PromptsTask
from rlsys.data.mix import MixtureTask
# isort: on
from rlsys.data.templates import (
    CHAT_SYSTEM_PROMPT,
    FEW_SHOT_TURNS,
    R1_ZERO_TEMPLATE,
    TEMPLATES,
    render_prompt,
)

__all__ = [
    "CHAT_SYSTEM_PROMPT",
    "FEW_SHOT_TURNS",
    "R1_ZERO_TEMPLATE",
    "TASKS",
    "TEMPLATES",
    "ArithmeticTask",
    "AsdivTask",
    "ChampTask",
    "DataError",
    "FileTask",
    "HumanEvalTask",
    "MixtureTask",
    "Problem",
    "PromptsTask",
    "ReasoningGymTask",
    "Task",
    "load_asdiv",
    "load_champ",
    "load_humaneval",
    "make_task",
    "register_task",
    "render_prompt",
]
