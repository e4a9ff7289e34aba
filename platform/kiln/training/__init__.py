"""The training loop, as a few stateful parts (state, checkpointer, evaluator, metrics) that
`fit` joins. Used unchanged by every launcher; it never imports Ray."""
