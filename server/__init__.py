"""ScrubIn: live remote shadowing for operating theatres.

Vocabulary (one module per noun): Theatre, Session, Participant/Role, Feed,
Subscription, Node. See docs/architecture.md.
"""
