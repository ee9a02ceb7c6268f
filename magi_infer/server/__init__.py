"""magi-serve: an HTTP server for one MagiPipeline (FastAPI + uvicorn).

The OpenAI Videos API (the official `openai` client works against it), the fragmented mp4 streamed while it is
generated, a WebSocket live session with chunk-wise prompts, and a web page. `create_app` (app.py) builds the
app around a pipeline; `magi-serve` (cli.py) builds the pipeline from conf/serve.yaml and runs it.
"""
