"""jetrun's services, agents, clients and CLI: everything that does I/O."""
