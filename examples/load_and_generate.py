"""Load an echo checkpoint (or convert on the fly) and stream a reply with mlx-lm.

    python examples/load_and_generate.py [MODEL] [PROMPT]
"""

import sys

import echo_mlx  # first: OpenBLAS on Linux
from mlx_lm import stream_generate

path = sys.argv[1] if len(sys.argv) > 1 else "default"
prompt = sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France?"

model, tokenizer = echo_mlx.load(path)  # an echo checkpoint dir, or a source converted with plan "none"
messages = [{"role": "user", "content": prompt}]
text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
for response in stream_generate(model, tokenizer, text, max_tokens=40, prompt_cache=model.make_cache()):
    print(response.text, end="", flush=True)
print()
