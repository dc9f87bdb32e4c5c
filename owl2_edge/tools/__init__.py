"""The tools around the answer path: quantizing, importance matrices, evaluation and comparison,
model-folder descriptions, the demo model's pictures and building, benchmarks, stock llama.cpp.

Nothing on the answer path imports from here; this is the only part of owl2_edge that may import
torch or the converter (lazily, for `owl2 convert`, `owl2 demo` and `owl2 bench --shape`).
"""
