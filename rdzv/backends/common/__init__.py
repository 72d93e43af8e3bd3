"""Pieces several backends share: the pumped change feed, a feed's start-over (resync), the
ticker, the state document, the run's keepers, torch Store adapters and the backoff."""
