"""Built-in text: the corpus (training, validation and held-out parts), the chat
set (prompts and the original model's answers), the general set (the original's own
text in many genres), and other-domain evaluation text."""

# Names of the built-in training data, as --data and --calibration take them:
# every set, or one of them.
BUILTIN_SETS = ("builtin", "corpus", "chat", "general")
