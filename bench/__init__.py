"""This layer's benchmarks beside its peers, run from a clone (not installed): ``python -m bench``.

:mod:`bench.run` is the command, :mod:`bench.scenarios` measures one layer in one scenario in a
subprocess (in the layer's own interpreter: it imports nothing of this project), :mod:`bench.layers`
says which layers can be measured, :mod:`bench.plots` draws the PNG files, and :mod:`bench.e2e`
(``python -m bench e2e``) runs a chat on real servers with real websocket clients.
"""
