"""`owl2 serve`: an OpenAI-compatible HTTP server over one Owl2 (docs/design.md §13).

    app.py     the routes; create_app   limits.py  the limits, OpenAI's error shape, the body
    fields.py  request fields          images.py  image_url parts and `images` items -> bytes
    queue.py   the queue for a slot     answer.py  one answer: an engine Job, read here
    shapes.py  response objects, SSE   stop.py    stop strings over a stream
    metrics.py counters, histograms     prometheus.py  their text format
    server.py  uvicorn, in the foreground or on a thread

Nothing is imported here: `owl2_edge.serve.limits` stays free of Starlette for the CLI.
"""
