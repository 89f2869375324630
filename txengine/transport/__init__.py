"""Transports: move sync messages as bytes (a bundle file; HTTP later).

A transport never decides what to send or what to keep: :mod:`txengine.sync`
builds and handles the messages; a transport only carries them.
"""
