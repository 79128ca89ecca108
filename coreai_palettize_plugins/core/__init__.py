"""What every layer builds on: validation, the distributed context, training strategies, linear-
like layers, inputs and model copies.
"""
