"""Settling: an Outcome becomes its publishes (with confirms), then its ack or nack.

- :mod:`pipeline.settle.settler`: the one place outcomes are carried out (reply, park,
  retry tier, requeue), then the delivery hooks hear of it;
- :mod:`pipeline.settle.publisher`: the one confirming, mandatory publish path;
- :mod:`pipeline.settle.guard`: who sent a request and whether its ``reply_to`` is theirs.
"""
