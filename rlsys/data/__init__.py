"""Data layer: tasks (problem sources with held-out splits) and prompt templates.

Pure leaves: no Ray, no actors, no model.
"""

from rlsys.data.asdiv import AsdivTask, load_asdiv
from rlsys.data.champ import ChampTask, load_champ
from rlsys.data.humaneval import HumanEvalTask, load_humaneval
from rlsys.data.tasks import (
    TASKS,
    ArithmeticTask,
    DataError,
    FileTask,
    MixtureTask,
    Problem,
    ReasoningGymTask,
    Task,
    make_task,
    register_task,
)
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
    "ReasoningGymTask",
    "Task",
    "load_asdiv",
    "load_champ",
    "load_humaneval",
    "make_task",
    "register_task",
    "render_prompt",
]
