"""The logic of the three Triton steps, as plain functions over numpy tensors.

The `model.py` files in `model_repository/` are thin shells over this package, so everything here is tested
without Triton as well as through it. Tensor names and shapes are in docs/tensors.md.
"""
