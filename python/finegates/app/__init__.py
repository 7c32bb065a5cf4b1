"""The ``finegates`` command line application (finetune | posttrain | pretrain) built on the library.

``cli`` parses and reports errors; ``recipes`` loads models and data, sparsifies, trains
(``trainer``, reading a ``finegates.TrainOptions``, on Accelerate through ``distributed``) and hands the end of a
run to ``run_summary``; ``run_dir`` owns the output directory, ``outputs`` its log and plot.
Nothing in the library imports from here.
"""
