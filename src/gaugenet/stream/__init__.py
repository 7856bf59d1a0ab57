"""Processing sharded safetensors checkpoints layer by layer, with discovery on meta."""

from ._checkpoint import ShardedCheckpoint as ShardedCheckpoint
from ._checkpoint import is_sharded as is_sharded
from ._process import StreamReport as StreamReport
from ._process import stream_equalize as stream_equalize
from ._process import stream_quantize as stream_quantize
