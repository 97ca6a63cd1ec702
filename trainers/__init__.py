"""Training, the background job runner, and sampling. Never imports gradio."""
