"""The converter: Hugging Face mPLUG-Owl2 checkpoint -> owl2-edge model folder.

Everything under here may import torch; the runtime (the rest of owl2_edge) never imports this
package except lazily for `owl2 convert` and `owl2 demo`.
"""
