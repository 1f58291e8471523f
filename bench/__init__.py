"""`make bench`: measured figures of both stages (step time, stage-1 cost, search scaling, cache size, input rate).

Run everything with ``python -m bench.run_all`` (``--quick`` for tiny sizes); each part is also a module
with its own ``main`` (``python -m bench.step_time --help``). Results land in bench/results/.
"""
