"""Zero-init attention on backbones other than LLaMA (docs/encoders.md): a frozen ViT or a
BERT-family encoder with gated prompts on its top layers and a task head. Ray-free, as all of
`adapter/`."""
