"""ScrubIn recorder: archives Sessions as just another client of the live path.

Not implemented yet (issue 5); the package exists so the layout is fixed.
"""
