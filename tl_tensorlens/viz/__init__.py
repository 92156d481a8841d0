"""Pictures and the HTML report (the optional ``plot`` extra): figures are returned, never shown;
matplotlib and circuitsvis are imported only inside the functions that draw."""
