"""finetune.server: the inference server for exported models (`finetune serve`).

Public API (nothing is imported here, so `import finetune.server` stays cheap):

- `finetune.server.settings.ServerSettings`: every setting, from flags or `FINETUNE_SERVE_*` env vars;
- `finetune.server.app.create_app(settings) -> FastAPI`: the app factory;
- `finetune.server.serving.serve(settings)`: run it under uvicorn until SIGTERM (blocking);
- `finetune.server.serving.start_in_thread(settings) -> RunningServer`: the same on a background
  thread, returning once ready (`.url`, `.name`, `.stop()`).

User documentation: docs/server.md.
"""
