"""Loading models from files or factories, and writing weights safely."""

from ._load import load_model as load_model
from ._load import load_state_dict as load_state_dict
from ._load import resolve_factory as resolve_factory
from ._save import check_writable as check_writable
from ._save import save_safetensors_atomic as save_safetensors_atomic
