"""The client side: publish chat requests and await their answer, whole or streamed.

- :mod:`pipeline.client.client`: :class:`~pipeline.client.client.HutchClient` (also
  exported as ``pipeline.HutchClient``), the facade over the parts below.
- :mod:`pipeline.client.connection`: the one supervised connection, the reply queue,
  publishing with confirms and retries, the topology check.
- :mod:`pipeline.client.router`: reply messages to the calls that wait for them.
- :mod:`pipeline.client.stream` and :mod:`pipeline.client.assembly`: a streamed answer,
  rebuilt from chunk messages and the final message.
- :mod:`pipeline.client.cancel`: cancels, in the foreground, the background and for
  ``hutch cancel``.
- :mod:`pipeline.client.replies`: reading a reply message (kind, completion, error).
"""
