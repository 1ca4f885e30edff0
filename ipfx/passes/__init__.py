"""The passes behind :func:`ipfx.transform` and :func:`ipfx.lower`, one concern per module.

* :mod:`.find_weights` (analysis): which parameters are conv/linear kernels.
* :mod:`.rewrite_weights`: kernel parameter -> coeff x mask x basis subgraph.
* :mod:`.subgraphs` (analysis): locate the compose subgraphs again in a transformed graph.
* :mod:`.lower_dense`: fold each subgraph into a dense weight and restore standard modules.
* :mod:`.lower_fused`: replace convs by sparse fused IP convolutions.
"""
