"""The web dashboard at /ui: a page drawn on the server (Jinja2), made live by htmx and a little
plain JavaScript that reads the API with the token the user gives it."""
