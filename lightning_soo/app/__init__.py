"""Application code behind the ``lightning-soo`` command (demo, compare, report). May import Lightning and the
``examples`` extra (scikit-learn, matplotlib); the numerical core does not."""
