"""Built-in text: the corpus (training, validation and held-out parts), the chat
set (prompts and the original model's answers), and other-domain evaluation text."""
