"""
Applications the tests serve: two versions of a WSGI app and of a raw protocol factory (so a test
sees that a successor runs its own code), and apps whose readiness is slow or fails.
"""
