"""Loading models from files or factories, sample inputs, and writing weights safely."""

from ._inputs import MAX_INPUT_NUMBERS as MAX_INPUT_NUMBERS
from ._inputs import sample_inputs as sample_inputs
from ._load import load_model as load_model
from ._load import load_state_dict as load_state_dict
from ._load import resolve_factory as resolve_factory
from ._save import atomic_path as atomic_path
from ._save import check_writable as check_writable
from ._save import save_safetensors_atomic as save_safetensors_atomic
