"""Text generation over any engine session: prompt -> tokens -> a cancellable stream of text."""
