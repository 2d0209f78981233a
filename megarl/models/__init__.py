"""Dense decoder shapes, Hugging Face config mapping, and the Megatron model builder."""
