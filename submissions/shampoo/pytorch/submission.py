"""Blocked Shampoo with Adam grafting and LAWA/EMA weight averaging, in PyTorch.

The averaging is chosen by the hyperparameters (`averaging`, `averaging_every`,
`lawa_window`, `ema_beta`, ...); see tuning_search_spaces/shampoo*.json.
"""

from polyak.algoperf.builder_torch import build_submission
from polyak.optim.shampoo_config import ShampooConfig
from polyak.optim.shampoo_torch import make_shampoo, training_metrics

_submission = build_submission(make_shampoo, ShampooConfig, optimizer_metrics=training_metrics)

init_optimizer_state = _submission.init_optimizer_state
update_params = _submission.update_params
prepare_for_eval = _submission.prepare_for_eval
get_batch_size = _submission.get_batch_size
data_selection = _submission.data_selection

# The self-tuning point; the study runner reads its names.
DEFAULT_HYPERPARAMETERS = ShampooConfig.DEFAULT_HYPERPARAMETERS
