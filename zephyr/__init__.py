"""Propeller on microcontroller boards: Zephyr RTOS firmware with WAMR, and its host build."""
