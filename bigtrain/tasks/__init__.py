"""Training objectives behind one small interface (base.py: collate, count targets, summed loss, eval metrics),
one module per objective, the registry that builds the recipe's, and the distillation teacher's checks.
May import torch, numpy, core and config (teacher.py: models and interop, for the teacher's model settings);
never data, parallel, checkpoint, train or the CLI. `from bigtrain.tasks import X` keeps working for the names below.
"""

from bigtrain.tasks.base import EVAL_KEY_OFFSET, IGNORE_INDEX, Task
from bigtrain.tasks.causal_lm import CausalLM, packed_documents
from bigtrain.tasks.classification import Classification, classification_scores
from bigtrain.tasks.distill import Distill, DistillClassification, distillation_loss_sum
from bigtrain.tasks.masked_lm import MaskedLM
from bigtrain.tasks.registry import TASKS, build_task
from bigtrain.tasks.sft import SFT

__all__ = ["EVAL_KEY_OFFSET", "IGNORE_INDEX", "SFT", "TASKS", "CausalLM", "Classification", "Distill",
           "DistillClassification", "MaskedLM", "Task", "build_task", "classification_scores",
           "distillation_loss_sum", "packed_documents"]
