"""The client side: publish chat requests and await their one reply.

- :mod:`pipeline.client.client`: :class:`~pipeline.client.client.HutchClient` (also
  exported as ``pipeline.HutchClient``).
"""
