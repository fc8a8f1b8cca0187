"""The worker's models and their speed levers.

One module per model (`sdxl`, `wan`: load once, warm up with one real call, `generate` one job), what
they share (`base`), and one module per speed lever (`float8`, `vae`, `step_cache`, `compile_cache`).
`model_handler.ModelHandler` holds the models and decides which one is on the GPU; `parallel`
runs the Wan model over several GPUs behind the same `VideoModel` interface. Importing a module
here loads no model.
"""
