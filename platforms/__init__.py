"""Hooks that run inside other programs and call the service over HTTP
(:class:`moderation.client.ModerationClient`): a Synapse module and a python-threatexchange
classifier. Each is an extra (``[synapse]``, ``[threatexchange]``); none is imported by the
service."""
