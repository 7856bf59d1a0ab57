"""Network families of the paper, with their gauge groups built in."""

from ._linear_network import LinearNetwork as LinearNetwork
