"""`owl2 bench`: owl2-edge's speed and memory against stock llama.cpp (llama-cpp-python, on the
same base GGUF) and against the stock pipeline (ONNX Runtime's fp32 vision + llama.cpp stitched
by hand), on one model folder or on a named shape built once with random weights.

    shapes   the named shapes (7b, 1b), each built once into a cached model folder
    workers  one measurement per process (decoder, vision, questions, the stock pipeline)
    stock    the stock pipeline itself
    runner   the plan of a run and its interleaved rounds
    report   medians, ratios, memory against what was loaded, the tables and the JSON

Benchmarks only: nothing here asserts a time; tests/test_bench.py checks that every row and
ratio is produced.
"""
