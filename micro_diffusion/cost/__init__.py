"""Cost accounting: analytic FLOPs, the device-hour and dollar ledger, estimates and the dashboard."""
