"""The `sandboxd` client: commands a Docker user would type, spoken to the daemon over HTTP.

Runs in: the user's shell, as any user who may open the daemon's socket (or reach its TCP
endpoint with the token). Imports nothing of the daemon but its default socket path.
"""
