"""The language model runtime: loading the base Llama (optionally 4-bit, optionally with LoRA), prompts, generation."""
